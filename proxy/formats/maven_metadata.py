"""Maven's ``maven-metadata.xml``: parsed with defusedxml, merged, and rendered anew.

Three kinds share the file name: the artifact's (its versions, ``latest``, ``release``), a
SNAPSHOT version's (the newest timestamp and build number, and per classifier and extension the
file that is current), and a group's (the plugin prefixes of its Maven plugins). Upstream files
are parsed (never with entity expansion) and rendered again from what was parsed, so nothing of
an upstream's XML reaches a client unchecked; a malformed one is reported and skipped.

Version order follows Maven's ComparableVersion closely enough for sorting real version lists:
numeric parts compare as numbers, the qualifiers alpha < beta < milestone < rc < snapshot <
release < sp, and unknown qualifiers after those, alphabetically.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from xml.etree.ElementTree import Element, SubElement, indent, tostring

from proxy import xmlsafe as xml

SNAPSHOT = "-SNAPSHOT"
MAX_METADATA = 4 * 2**20
# a-1.0-20240101.120000-3[-classifier].ext (the version part: 1.0-20240101.120000-3)
TIMESTAMPED = re.compile(r"^(?P<base>.+)-(?P<ts>\d{8}\.\d{6})-(?P<build>\d+)$")


class MetadataError(ValueError):
    """The document is not well-formed maven-metadata.xml."""


@dataclass(frozen=True, slots=True)
class Plugin:
    name: str
    prefix: str
    artifact_id: str


@dataclass(frozen=True, slots=True)
class SnapshotFile:
    """One current file of a SNAPSHOT version: its classifier, extension and timestamped version."""

    classifier: str
    extension: str
    value: str
    updated: str


@dataclass(slots=True)
class Metadata:
    """What any of the three kinds of maven-metadata.xml says."""

    group_id: str = ""
    artifact_id: str = ""
    version: str = ""
    versions: list[str] = field(default_factory=list)
    last_updated: str = ""
    plugins: list[Plugin] = field(default_factory=list)
    snapshot_timestamp: str = ""
    snapshot_build: int = 0
    snapshot_files: list[SnapshotFile] = field(default_factory=list)


def parse(body: bytes) -> Metadata:
    """Parse maven-metadata.xml; :class:`MetadataError` says what is wrong with it."""
    if len(body) > MAX_METADATA:
        raise MetadataError(f"maven-metadata.xml larger than {MAX_METADATA} bytes")
    try:
        root = xml.parse(body)
    except xml.XmlError as exc:
        raise MetadataError(f"malformed maven-metadata.xml: {exc}") from exc
    if xml.local(root.tag) != "metadata":
        raise MetadataError(f"not maven-metadata.xml: the root element is <{xml.local(root.tag)}>")
    meta = Metadata(
        group_id=xml.text(root, "groupId"),
        artifact_id=xml.text(root, "artifactId"),
        version=xml.text(root, "version"),
    )
    versioning = xml.child(root, "versioning")
    if versioning is not None:
        meta.last_updated = xml.text(versioning, "lastUpdated")
        versions = xml.child(versioning, "versions")
        if versions is not None:
            meta.versions = [v.text.strip() for v in versions if xml.local(v.tag) == "version" and v.text]
        snapshot = xml.child(versioning, "snapshot")
        if snapshot is not None:
            meta.snapshot_timestamp = xml.text(snapshot, "timestamp")
            build = xml.text(snapshot, "buildNumber")
            meta.snapshot_build = int(build) if build.isdigit() else 0
        files = xml.child(versioning, "snapshotVersions")
        for item in files if files is not None else ():
            meta.snapshot_files.append(
                SnapshotFile(
                    classifier=xml.text(item, "classifier"),
                    extension=xml.text(item, "extension"),
                    value=xml.text(item, "value"),
                    updated=xml.text(item, "updated"),
                )
            )
    plugins = xml.child(root, "plugins")
    for item in plugins if plugins is not None else ():
        meta.plugins.append(
            Plugin(xml.text(item, "name"), xml.text(item, "prefix"), xml.text(item, "artifactId"))
        )
    for version in meta.versions:
        if not valid_version(version):
            raise MetadataError(f"maven-metadata.xml lists an invalid version {version!r}")
    return meta


def render_artifact(
    group_id: str,
    artifact_id: str,
    versions: Iterable[str],
    last_updated: str,
    plugins: Sequence[Plugin] = (),
) -> bytes:
    """An artifact's (or a group's) metadata: versions in Maven order, latest and release."""
    root = Element("metadata", modelVersion="1.1.0")
    if group_id:
        SubElement(root, "groupId").text = group_id
    if artifact_id:
        SubElement(root, "artifactId").text = artifact_id
    ordered = sort_versions(set(versions))
    if ordered:
        versioning = SubElement(root, "versioning")
        SubElement(versioning, "latest").text = ordered[-1]
        releases = [v for v in ordered if not v.endswith(SNAPSHOT)]
        if releases:
            SubElement(versioning, "release").text = releases[-1]
        listed = SubElement(versioning, "versions")
        for version in ordered:
            SubElement(listed, "version").text = version
        SubElement(versioning, "lastUpdated").text = last_updated or timestamp()
    if plugins:
        listed = SubElement(root, "plugins")
        for plugin in plugins:
            item = SubElement(listed, "plugin")
            SubElement(item, "name").text = plugin.name
            SubElement(item, "prefix").text = plugin.prefix
            SubElement(item, "artifactId").text = plugin.artifact_id
    return _serialize(root)


def render_snapshot(group_id: str, artifact_id: str, version: str, meta: Metadata) -> bytes:
    """A SNAPSHOT version's metadata."""
    root = Element("metadata", modelVersion="1.1.0")
    SubElement(root, "groupId").text = group_id
    SubElement(root, "artifactId").text = artifact_id
    SubElement(root, "version").text = version
    versioning = SubElement(root, "versioning")
    if meta.snapshot_timestamp:
        snapshot = SubElement(versioning, "snapshot")
        SubElement(snapshot, "timestamp").text = meta.snapshot_timestamp
        SubElement(snapshot, "buildNumber").text = str(meta.snapshot_build)
    SubElement(versioning, "lastUpdated").text = meta.last_updated or timestamp()
    if meta.snapshot_files:
        listed = SubElement(versioning, "snapshotVersions")
        for item in meta.snapshot_files:
            entry = SubElement(listed, "snapshotVersion")
            if item.classifier:
                SubElement(entry, "classifier").text = item.classifier
            SubElement(entry, "extension").text = item.extension
            SubElement(entry, "value").text = item.value
            SubElement(entry, "updated").text = item.updated
    return _serialize(root)


def snapshot_from_files(artifact_id: str, version: str, filenames: Iterable[str]) -> Metadata | None:
    """The SNAPSHOT metadata that the deployed timestamped files of ``version`` imply.

    The newest build wins per (classifier, extension); checksum and signature files are skipped.
    None when no timestamped file is there.
    """
    base = version.removesuffix(SNAPSHOT)
    prefix = f"{artifact_id}-{base}-"
    newest: dict[tuple[str, str], tuple[int, str, str]] = {}
    best: tuple[int, str] | None = None
    for name in filenames:
        if not name.startswith(prefix) or is_checksum(name) or name.endswith(".asc"):
            continue
        m = re.match(r"^(\d{8}\.\d{6})-(\d+)(?:-([^.]+))?\.(.+)$", name[len(prefix) :])
        if m is None:
            continue
        ts, build, classifier, extension = m.group(1), int(m.group(2)), m.group(3) or "", m.group(4)
        key = (classifier, extension)
        if key not in newest or newest[key][0] < build:
            newest[key] = (build, ts, f"{base}-{ts}-{build}")
        if best is None or best[0] < build:
            best = (build, ts)
    if best is None:
        return None
    files = [
        SnapshotFile(classifier, extension, value, ts.replace(".", ""))
        for (classifier, extension), (_, ts, value) in sorted(newest.items())
    ]
    return Metadata(
        artifact_id=artifact_id,
        version=version,
        last_updated=max(f.updated for f in files),
        snapshot_timestamp=best[1],
        snapshot_build=best[0],
        snapshot_files=files,
    )


def is_checksum(name: str) -> bool:
    return name.endswith((".sha1", ".md5", ".sha256", ".sha512"))


def timestamp(when: float | None = None) -> str:
    """Maven's ``lastUpdated`` form: yyyyMMddHHmmss in UTC."""
    moment = datetime.fromtimestamp(when, UTC) if when is not None else datetime.now(UTC)
    return moment.strftime("%Y%m%d%H%M%S")


_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-+~]{0,127}$")


def valid_version(version: str) -> bool:
    return bool(_VERSION_RE.match(version))


_QUALIFIERS = {"alpha": 0, "a": 0, "beta": 1, "b": 1, "milestone": 2, "m": 2, "rc": 3, "cr": 3}
_QUALIFIERS |= {"snapshot": 4, "": 5, "ga": 5, "final": 5, "release": 5, "sp": 6}


def version_key(version: str) -> tuple[Any, ...]:
    """A sort key close to Maven's ComparableVersion (see the module docstring)."""
    parts: list[tuple[Any, ...]] = []
    for token in re.findall(r"\d+|[A-Za-z]+", version.lower()):
        if token.isdigit():
            parts.append((2, int(token)))
        elif token in _QUALIFIERS:
            parts.append((1, _QUALIFIERS[token]))
        else:
            parts.append((1, 7, token))
    # 1.0 == 1 == 1.0.0-final: release qualifiers go, and so do zeros before a qualifier or the end.
    parts = [p for p in parts if p != (1, 5)]
    kept: list[tuple[Any, ...]] = []
    for i, part in enumerate(parts):
        following = next((p for p in parts[i + 1 :] if p != (2, 0)), None)
        if part == (2, 0) and (following is None or following[0] == 1):
            continue
        kept.append(part)
    parts = kept
    # A release (nothing after the numbers) sorts after its qualified forms: 1.0-rc1 < 1.0.
    return (*parts, (1, 5))


def sort_versions(versions: Iterable[str]) -> list[str]:
    return sorted(versions, key=lambda v: (version_key(v), v))


def newest(values: Iterable[str]) -> str:
    return max((v for v in values if v), default="")


def plugins_merged(lists: Iterable[Sequence[Plugin]]) -> list[Plugin]:
    """Plugins of several group metadata files: the first mention of each prefix wins."""
    seen: dict[str, Plugin] = {}
    for plugins in lists:
        for plugin in plugins:
            seen.setdefault(plugin.prefix, plugin)
    return sorted(seen.values(), key=lambda p: p.prefix)


def as_plugins(raw: Sequence[Mapping[str, str]]) -> list[Plugin]:
    return [Plugin(p.get("name", ""), p.get("prefix", ""), p.get("artifact_id", "")) for p in raw]


def _serialize(root: Element) -> bytes:
    indent(root)
    body: bytes = tostring(root, encoding="utf-8", xml_declaration=False)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body + b"\n"
