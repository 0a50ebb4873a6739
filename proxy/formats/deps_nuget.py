"""NuGet dependencies: the dependency groups of the version's .nuspec, one per target framework.

The source is the .nuspec stored beside a cached .nupkg (the proxy extracts it) or, failing that,
the one inside the .nupkg (published packages). Parsed with defusedxml, by local element name.
A dependency outside any group (the old flat form) has no target framework.

Ranges are NuGet's: a bare version ``1.0`` means 1.0 or later; ``[1.0]`` exactly; ``[1.0,2.0)``,
``(,1.0]``, ``(1.0,)`` with inclusive ``[]`` and exclusive ``()`` ends; an empty range, any
version. Versions compare in NuGet's order (nuget_versions.sort_key: SemVer 2.0 with a fourth
part). Like NuGet's ``VersionRange.Satisfies``, a range admits a pre-release within its bounds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, BinaryIO

from proxy import xmlsafe as xml
from proxy.formats import nuget_versions as nv
from proxy.formats.deps_base import Declared, DependencyReader, RangeError, read_limited, zip_member


class NuGetDependencies(DependencyReader):
    format = "nuget"

    def source_rank(self, filename: str) -> int | None:
        if filename.endswith(".nuspec"):
            return 0
        if filename.endswith(".nupkg"):
            return 1
        return None

    def read(self, filename: str, blob: Callable[[], BinaryIO]) -> list[Declared]:
        if filename.endswith(".nuspec"):
            with blob() as raw:
                body = read_limited(raw)
        else:
            body = zip_member(blob, lambda name: "/" not in name and name.lower().endswith(".nuspec"))
        return parse_nuspec(body)

    def normalize(self, name: str) -> str:
        if not nv.valid_id(name):
            raise RangeError(f"{name!r} is not a valid NuGet package id")
        return name.lower()

    def version_key(self, version: str) -> Any:
        try:
            nv.parse(version)
        except ValueError as exc:
            raise RangeError(str(exc)) from exc
        return nv.sort_key(version)

    def admits(self, spec: str, version: str) -> bool:
        key = self.version_key(version)
        spec = spec.strip()
        if not spec:
            return True
        if not spec.startswith(("[", "(")):
            return bool(key >= self.version_key(spec))  # "1.0": 1.0 or later
        if not spec.endswith(("]", ")")):
            raise RangeError(f"{spec!r} is not a NuGet version range")
        inner = spec[1:-1]
        if "," not in inner:
            if spec[0] != "[" or spec[-1] != "]" or not inner.strip():
                raise RangeError(f"{spec!r} is not a NuGet version range")
            return bool(key == self.version_key(inner.strip()))
        low, _, high = (part.strip() for part in inner.partition(","))
        if "," in high or (not low and not high):
            raise RangeError(f"{spec!r} is not a NuGet version range")
        if low:
            lk = self.version_key(low)
            if key < lk or (key == lk and spec[0] == "("):
                return False
        if high:
            hk = self.version_key(high)
            if key > hk or (key == hk and spec[-1] == ")"):
                return False
        return True


def parse_nuspec(body: bytes) -> list[Declared]:
    root = xml.parse(body)
    metadata = xml.child(root, "metadata")
    if xml.local(root.tag) != "package" or metadata is None:
        raise ValueError("not a nuspec: no <package><metadata>")
    deps = xml.child(metadata, "dependencies")
    found: list[Declared] = []
    for node in [] if deps is None else list(deps):
        if xml.local(node.tag) == "group":
            framework = node.get("targetFramework", "")
            for item in node:
                if xml.local(item.tag) == "dependency":
                    found.extend(_dependency(item, framework))
        elif xml.local(node.tag) == "dependency":
            found.extend(_dependency(node, ""))
    return found


def _dependency(node: Any, framework: str) -> list[Declared]:
    package_id = node.get("id", "")
    if not nv.valid_id(package_id):
        return []
    return [Declared(package_id.lower(), node.get("version", "").strip(), "runtime", condition=framework)]
