"""The registry of package formats: adding one is a module plus one line in ``FORMATS``."""

from proxy.formats.base import FormatAdapter
from proxy.formats.maven import MavenAdapter
from proxy.formats.npm import NpmAdapter
from proxy.formats.nuget import NuGetAdapter
from proxy.formats.pypi import PyPIAdapter

FORMATS: tuple[type[FormatAdapter], ...] = (PyPIAdapter, NpmAdapter, MavenAdapter, NuGetAdapter)
