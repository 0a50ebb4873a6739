"""PyPI dependencies: ``Requires-Dist`` of the core metadata, read with ``packaging`` (PEP 508).

The source of a version's dependencies, best first: the PEP 658 ``.metadata`` file stored beside
a wheel (the upstream's, or the one the proxy extracted), the wheel's own
``*.dist-info/METADATA``, an sdist's ``PKG-INFO``. Extras and markers are kept as text; a
dependency that holds only under a marker or for an extra still counts as declared. Ranges are
PEP 440 specifier sets evaluated with packaging; a pre-release within the bounds is admitted,
since PEP 440 lets an installer take one (no final release satisfies, or ``--pre``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from email.parser import BytesHeaderParser
from typing import Any, BinaryIO

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from proxy.formats.deps_base import (
    Declared,
    DependencyReader,
    RangeError,
    read_limited,
    tar_top_member,
    zip_member,
)

_NAME = re.compile(r"^([A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9])\Z", re.IGNORECASE)
_SDISTS = (".tar.gz", ".zip")


class PyPIDependencies(DependencyReader):
    format = "pypi"
    probe_version = "1.0"

    def source_rank(self, filename: str) -> int | None:
        if filename.endswith(".whl.metadata"):
            return 0
        if filename.endswith(".whl"):
            return 1
        if filename.endswith(_SDISTS):
            return 2
        return None

    def read(self, filename: str, blob: Callable[[], BinaryIO]) -> list[Declared]:
        if filename.endswith(".metadata"):
            with blob() as raw:
                text = read_limited(raw)
        elif filename.endswith(".whl"):
            text = zip_member(blob, _is_wheel_metadata)
        elif filename.endswith(".zip"):
            text = zip_member(blob, lambda name: name.count("/") == 1 and name.endswith("/PKG-INFO"))
        else:
            text = tar_top_member(blob, "PKG-INFO")
        return parse_metadata(text)

    def normalize(self, name: str) -> str:
        if not _NAME.match(name):
            raise RangeError(f"{name!r} is not a valid Python package name")
        return canonicalize_name(name)

    def version_key(self, version: str) -> Any:
        try:
            return Version(version)
        except InvalidVersion as exc:
            raise RangeError(f"{version!r} is not a PEP 440 version") from exc

    def admits(self, spec: str, version: str) -> bool:
        if spec.startswith("@"):  # a direct reference (a URL): no index version satisfies it
            return False
        try:
            specifiers = SpecifierSet(spec)
        except InvalidSpecifier as exc:
            raise RangeError(f"{spec!r} is not a PEP 440 version specifier") from exc
        # A pre-release within the bounds counts: PEP 440 lets an installer take one when no final
        # release satisfies the specifier, or when asked (--pre); the question is "could it".
        return specifiers.contains(self.version_key(version), prereleases=True)


def parse_metadata(text: bytes) -> list[Declared]:
    """The ``Requires-Dist`` fields of core metadata; lines that are not PEP 508 are skipped."""
    headers = BytesHeaderParser().parsebytes(text)
    found: list[Declared] = []
    for line in headers.get_all("Requires-Dist") or []:
        try:
            req = Requirement(str(line))
        except InvalidRequirement:
            continue
        found.append(
            Declared(
                package=canonicalize_name(req.name),
                range=f"@ {req.url}" if req.url else str(req.specifier),
                kind="runtime",
                extras=",".join(sorted(req.extras)),
                condition=str(req.marker) if req.marker is not None else "",
            )
        )
    return found


def _is_wheel_metadata(name: str) -> bool:
    return name.count("/") == 1 and name.endswith(".dist-info/METADATA")
