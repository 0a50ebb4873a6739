"""The dependency readers, one per format, by format name (see deps_base.py)."""

from __future__ import annotations

from proxy.formats.deps_base import DependencyReader
from proxy.formats.deps_maven import MavenDependencies
from proxy.formats.deps_npm import NpmDependencies
from proxy.formats.deps_nuget import NuGetDependencies
from proxy.formats.deps_pypi import PyPIDependencies

READERS: dict[str, DependencyReader] = {
    reader.format: reader
    for reader in (PyPIDependencies(), NpmDependencies(), MavenDependencies(), NuGetDependencies())
}
