"""The adapter interface: the only per-format code.

An adapter parses its registry's documents into neutral :class:`Listing` values and renders
them back with URLs pointing at the proxy; it declares its routes and asks the pipeline for
everything else (chain walk, freshness, single-flight, hashes, blobs, index). Adapters never
touch SQL or files.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar

from aiohttp import web

from proxy.model import AssetRecord, ListedFile, Listing
from proxy.pipeline.documents import DocumentRequest

if TYPE_CHECKING:
    from proxy.pipeline.publish import Publisher, Upload
    from proxy.pipeline.services import Pipeline

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One route below ``/{domain}/{format}/{repo}``: method, path suffix, handler."""

    method: str
    suffix: str
    handler: Handler
    permission: str | None = None  # read, publish, delete; by default from the method


class FormatAdapter(ABC):
    """One package format. Subclasses are listed in ``proxy.formats.FORMATS``."""

    name: ClassVar[str]
    # Maven: a file's upstream URL follows from its name, and no listing names the files; the
    # resolver then asks ``locate`` instead of looking the file up in the merged listing.
    files_at_paths: ClassVar[bool] = False
    # NuGet: a connection's URL is a service index that says where the package documents are.
    discovers_service: ClassVar[bool] = False

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    @abstractmethod
    def routes(self) -> Sequence[RouteSpec]:
        """The format's endpoints, relative to the repository's base path."""

    @abstractmethod
    def normalize(self, package: str) -> str:
        """The one canonical identity of a package name; raises BadRequest if it is invalid."""

    def normalize_prefix(self, prefix: str) -> str:
        """The canonical form of a name prefix (origin rules such as ``acme-*``); BadRequest if no
        valid name starts so. By default a prefix is completed to a name: "Acme_" -> "acme-"."""
        return self.normalize(prefix + "x")[:-1]

    @abstractmethod
    def document_request(self, index_url: str, package: str) -> DocumentRequest:
        """How to ask an upstream at ``index_url`` for the metadata of ``package``."""

    @abstractmethod
    def parse_listing(self, body: bytes, content_type: str, url: str, source: str) -> Listing:
        """An upstream document as a neutral listing; file URLs made absolute."""

    def locate(self, index_url: str, package: str, filename: str) -> tuple[str, DocumentRequest | None]:
        """(files_at_paths formats) The file's URL at an upstream, and the request for the
        checksum document that vouches for its bytes (None when the format has none)."""
        raise NotImplementedError

    def checksum_hashes(self, body: bytes) -> dict[str, str]:
        """(files_at_paths formats) The hashes a checksum document states; ValueError if none."""
        raise NotImplementedError

    def version_of(self, filename: str) -> str | None:
        """(files_at_paths formats) The version a file belongs to."""
        return None

    def service_base(self, body: bytes) -> str:
        """(discovers_service formats) From a connection's service index, the URL that
        ``document_request`` builds on; ValueError when the index is unusable."""
        raise NotImplementedError

    def linked_documents(self, listing: Listing) -> list[DocumentRequest]:
        """Documents an upstream listing links instead of inlining (NuGet's registration pages)."""
        return []

    def with_linked(self, listing: Listing, bodies: list[bytes], source: str) -> Listing:
        """The listing completed with its linked documents, in the order they were asked for."""
        return listing

    def content_type(self, filename: str) -> str:
        """The media type an asset is served with."""
        return "application/octet-stream"

    def hosted_file(
        self, record: AssetRecord, attributes: Mapping[str, Any], *, hidden: bool, upload_time: str
    ) -> ListedFile:
        """A published file as a listing entry (its bytes are already in the blob store)."""
        return ListedFile(
            filename=record.filename,
            url="",
            source="",
            hashes={"sha256": record.digest.hex},
            version=record.version,
            size=record.size,
            hidden=hidden or self.is_companion(record.filename),
            extra={"upload_time": upload_time},
        )

    def describe_cached(self, entry: ListedFile, hashes: Mapping[str, str], size: int) -> ListedFile:
        """An upstream entry made to describe the cached bytes of its file (an upstream that
        changed a cached release is not followed; pipeline/mutations.py): every integrity field
        the adapter renders must now state ``hashes`` (same algorithms as declared) and ``size``."""
        return replace(entry, hashes=dict(hashes), size=size)

    def hosted_extra(self, tags: Mapping[str, str], times: Mapping[str, str | None]) -> dict[str, Any]:
        """Package-level fields of the published versions (npm: dist-tags and times)."""
        return {}

    def is_companion(self, filename: str) -> bool:
        """Whether a file only accompanies another (and so is never listed on its own)."""
        return False

    async def read_upload(self, request: web.Request, publisher: Publisher) -> Upload:
        """Parse and validate a publish request, staging its file; 400/413 on bad input."""
        raise NotImplementedError

    def derive(self, entry: ListedFile, blob: Callable[[], BinaryIO]) -> list[tuple[str, bytes, str]]:
        """Companion files extracted from a cached asset: (filename, bytes, content type).

        Runs in a worker thread right after the asset is committed; ``blob()`` opens its
        plaintext (it may be encrypted at rest). PyPI uses it to serve PEP 658 metadata for
        wheels whose upstream offered none; Maven, checksums; NuGet, the .nuspec.
        """
        return []
