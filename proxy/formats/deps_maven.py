"""Maven dependencies: the ``<dependencies>`` of a version's POM with their scopes, its parent
POM reference, and BOM imports (``<dependencyManagement>`` entries of scope ``import``).

The POM is parsed with defusedxml (proxy/xmlsafe.py), by local element name. ``${…}`` in a
version is replaced from the POM's own ``<properties>`` and its coordinates (``project.version``,
``project.parent.version``…); what the POM cannot resolve alone (a property of the parent, a
version managed elsewhere) is kept as written and admits no version. Profiles are not applied.

Ranges: ``[1.0,2.0)``, ``(,1.0]``, ``[1.0]``, ``[1.2,)`` and unions ``(,1.0],[1.2,)``, in
Maven's version order (``maven_metadata.version_key``). A bare version such as ``1.0`` is
Maven's soft requirement: Maven takes exactly that version unless a conflict elsewhere picks
another, so it admits that version only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO
from xml.etree.ElementTree import Element

from proxy import xmlsafe as xml
from proxy.formats.deps_base import Declared, DependencyReader, RangeError, read_limited
from proxy.formats.maven_metadata import valid_version
from proxy.formats.maven_metadata import version_key as maven_key
from proxy.formats.maven_paths import valid_package

_PROPERTY = re.compile(r"\$\{([^}]+)\}")
_SET = re.compile(r"\s*([\[(])\s*([^,\])]*?)\s*(?:,\s*([^\])]*?)\s*)?([\])])\s*")


class MavenDependencies(DependencyReader):
    format = "maven"
    probe_version = "1.0"

    def source_rank(self, filename: str) -> int | None:
        return 0 if filename.endswith(".pom") else None

    def read(self, filename: str, blob: Callable[[], BinaryIO]) -> list[Declared]:
        with blob() as raw:
            return parse_pom(read_limited(raw))

    def normalize(self, name: str) -> str:
        if not valid_package(name):
            raise RangeError(f"{name!r} is not a Maven groupId:artifactId")
        return name

    def version_key(self, version: str) -> Any:
        if not valid_version(version):
            raise RangeError(f"{version!r} is not a Maven version")
        return maven_key(version)

    def admits(self, spec: str, version: str) -> bool:
        key = self.version_key(version)
        spec = spec.strip()
        if not spec.startswith(("[", "(")):
            return bool(self.version_key(spec) == key)  # a soft requirement: that version
        return any(_in_set(bounds, key, self) for bounds in _sets(spec))


def _sets(spec: str) -> list[tuple[str, str, str | None, str]]:
    """``[1.0,2.0),[3,)`` as (open, low, high or None for ``[x]``, close) tuples."""
    found = []
    pos = 0
    while pos < len(spec):
        m = _SET.match(spec, pos)
        if m is None:
            raise RangeError(f"{spec!r} is not a Maven version range")
        found.append((m.group(1), m.group(2), m.group(3), m.group(4)))
        pos = m.end()
        if pos < len(spec):
            if spec[pos] != ",":
                raise RangeError(f"{spec!r} is not a Maven version range")
            pos += 1
    if not found:
        raise RangeError(f"{spec!r} is not a Maven version range")
    return found


def _in_set(bounds: tuple[str, str, str | None, str], key: Any, reader: MavenDependencies) -> bool:
    opening, low, high, closing = bounds
    if high is None:  # "[1.0]": exactly
        if opening != "[" or closing != "]" or not low:
            raise RangeError(f"{opening}{low}{closing} is not a Maven version range")
        return bool(reader.version_key(low) == key)
    if low:
        lk = reader.version_key(low)
        if key < lk or (key == lk and opening == "("):
            return False
    if high:
        hk = reader.version_key(high)
        if key > hk or (key == hk and closing == ")"):
            return False
    return True


def parse_pom(body: bytes) -> list[Declared]:
    root = xml.parse(body)
    if xml.local(root.tag) != "project":
        raise ValueError("not a POM: the root element is not <project>")
    parent = xml.child(root, "parent")
    props = _properties(root, parent)
    found: list[Declared] = []
    if parent is not None:
        coords = f"{xml.text(parent, 'groupId')}:{xml.text(parent, 'artifactId')}"
        found.append(Declared(coords, _interpolate(xml.text(parent, "version"), props), "parent"))
    deps = xml.child(root, "dependencies")
    for node in _children(deps, "dependency"):
        found.append(_dependency(node, props))
    management = xml.child(root, "dependencyManagement")
    managed = xml.child(management, "dependencies") if management is not None else None
    for node in _children(managed, "dependency"):
        if xml.text(node, "scope") == "import":
            found.append(_dependency(node, props))
    return found


def _children(node: Element | None, name: str) -> list[Element]:
    return [] if node is None else [c for c in node if xml.local(c.tag) == name]


def _dependency(node: Element, props: Mapping[str, str]) -> Declared:
    group = _interpolate(xml.text(node, "groupId"), props)
    artifact = _interpolate(xml.text(node, "artifactId"), props)
    optional = _interpolate(xml.text(node, "optional"), props) == "true"
    return Declared(
        package=f"{group}:{artifact}",
        range=_interpolate(xml.text(node, "version"), props),
        kind=_interpolate(xml.text(node, "scope"), props) or "compile",
        condition="optional" if optional else "",
    )


def _properties(root: Element, parent: Element | None) -> dict[str, str]:
    props: dict[str, str] = {}
    holder = xml.child(root, "properties")
    for item in [] if holder is None else list(holder):
        props[xml.local(item.tag)] = (item.text or "").strip()
    parent_group = xml.text(parent, "groupId") if parent is not None else ""
    parent_version = xml.text(parent, "version") if parent is not None else ""
    group = xml.text(root, "groupId") or parent_group
    version = xml.text(root, "version") or parent_version
    for prefix in ("project.", "pom.", ""):
        props[f"{prefix}groupId"] = group
        props[f"{prefix}artifactId"] = xml.text(root, "artifactId")
        props[f"{prefix}version"] = version
    props["project.parent.version"] = props["parent.version"] = parent_version
    props["project.parent.groupId"] = props["parent.groupId"] = parent_group
    return props


def _interpolate(text: str, props: Mapping[str, str]) -> str:
    """``${x}`` from the properties, a few levels deep; unknown ones stay as written."""
    for _ in range(5):
        replaced = _PROPERTY.sub(lambda m: props.get(m.group(1), m.group(0)), text)
        if replaced == text:
            break
        text = replaced
    return text
