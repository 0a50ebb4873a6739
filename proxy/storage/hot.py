"""The in-memory layer in front of the index: bounded, and invalidated on every write.

Cache hits must not touch SQLite: a warm simple page or a cached wheel is answered from here
plus one ``sendfile``. Asset rows are bounded by count; parsed listings and rendered pages by
bytes (``server.memory_cache_size``, split between them), because one npm packument can weigh
tens of megabytes and memory must not grow with payload sizes. Rendered pages also carry their
own expiry (the earliest expiry of the documents they were built from) and a fingerprint of
what they were built from, so an expired page whose sources did not change (an upstream 304) is
renewed rather than rendered again. Pages too big for memory live in files (storage/page_files.py)
and count a sixteenth of their size here, which bounds the disk they take too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from cachetools import LRUCache

from proxy.model import AssetRecord, Listing, RepoRef
from proxy.storage.page_files import PageFile

AssetKey = tuple[RepoRef, str, str, str]  # repository, format, package, filename
PackageKey = tuple[str, str, str]  # domain, format, package
PageKey = tuple[PackageKey, Hashable]  # package, variant (repository, media type, base URL)
ENTRY_OVERHEAD = 512  # bytes counted per entry besides its payload
# What one file of a parsed listing takes in Python objects (ListedFile, its dicts and strings):
# measured ~1 KB for PyPI JSON pages and ~2.2 KB for npm packuments, i.e. about 5x the bytes of
# the document they came from. Charged on top of the document's size, so that the budget bounds
# real memory rather than a fifth of it (bench/index_scale.py: 90k distinct pages went past
# 400 MB of RSS under the default 128 MiB budget when only the document bytes were counted).
LISTED_FILE_BYTES = 2048
DISK_WEIGHT = 16  # a page kept in files counts 1/16 of its size against the memory budget


@dataclass(frozen=True, slots=True)
class RenderedPage:
    """A rendered metadata response, ready to send again until ``expires_at``."""

    body: bytes
    content_type: str
    etag: str
    cache_status: str
    expires_at: float
    headers: tuple[tuple[str, str], ...] = ()
    gzip_body: bytes | None = None
    br_body: bytes | None = None
    fingerprint: Hashable = None  # what the body was built from (see the module docstring)
    files: tuple[PageFile, ...] = ()  # when set, the bodies live in these files instead

    def weight(self) -> int:
        """What the page counts against the memory budget."""
        in_memory = len(self.body) + len(self.gzip_body or b"") + len(self.br_body or b"")
        on_disk = sum(size for _, _, size in self.files)
        return in_memory + on_disk // DISK_WEIGHT + ENTRY_OVERHEAD


@dataclass(frozen=True, slots=True)
class _SizedListing:
    listing: Listing
    size: int


class _EvictingLRU(LRUCache[Any, Any]):
    """An LRU that reports evictions, so a side index of its keys stays true."""

    def __init__(
        self, maxsize: int, getsizeof: Callable[[Any], int], on_evict: Callable[[Any, Any], None]
    ) -> None:
        super().__init__(maxsize=maxsize, getsizeof=getsizeof)
        self._on_evict = on_evict

    def popitem(self) -> tuple[Any, Any]:
        key, value = super().popitem()
        self._on_evict(key, value)
        return key, value


class HotCache:
    """Bounded LRU caches for asset rows, parsed listings and rendered pages."""

    def __init__(
        self,
        entries: int,
        memory_bytes: int = 128 * 2**20,
        on_page_drop: Callable[[tuple[PageFile, ...]], None] | None = None,
    ) -> None:
        self._assets: LRUCache[AssetKey, AssetRecord] = LRUCache(maxsize=entries)
        self._listings: LRUCache[Hashable, _SizedListing] = LRUCache(
            maxsize=max(1, memory_bytes // 2), getsizeof=lambda item: item.size + ENTRY_OVERHEAD
        )
        self._pages = _EvictingLRU(
            max(1, memory_bytes // 2),
            getsizeof=lambda page: page.weight(),
            on_evict=self._page_evicted,
        )
        self._on_page_drop = on_page_drop
        # Variants by package, so one asset write invalidates every rendering of the package.
        self._variants: dict[PackageKey, set[Hashable]] = {}
        # Counts clear(): what was looked up before one must not be remembered after it (the
        # lookup may have read the index before another worker's commit).
        self.epoch = 0

    # asset rows
    def asset(self, key: AssetKey) -> AssetRecord | None:
        return self._assets.get(key)

    def remember_asset(self, record: AssetRecord) -> None:
        self._assets[(record.repo, record.format, record.package, record.filename)] = record

    def forget_asset(self, key: AssetKey) -> None:
        self._assets.pop(key, None)

    def forget_package_assets(self, repo: RepoRef, fmt: str, package: str) -> None:
        for key in [k for k in self._assets if k[:3] == (repo, fmt, package)]:
            self._assets.pop(key, None)

    def clear(self) -> None:
        """Forget everything (another process changed the index)."""
        self.epoch += 1
        self._assets.clear()
        self._listings.clear()
        self.clear_pages()

    # parsed listings, keyed by the identity of the document they were parsed from
    def listing(self, key: Hashable) -> Listing | None:
        found = self._listings.get(key)
        return found.listing if found is not None else None

    def remember_listing(self, key: Hashable, listing: Listing, size: int) -> None:
        """Keep a parsed listing; ``size`` is the byte size of the document it came from (the
        parsed objects are charged too: see LISTED_FILE_BYTES)."""
        weight = size + len(listing.files) * LISTED_FILE_BYTES
        with contextlib.suppress(ValueError):  # larger than the whole budget: not kept
            self._listings[key] = _SizedListing(listing, weight)

    # rendered pages
    def page(self, package: PackageKey, variant: Hashable) -> RenderedPage | None:
        """The page while it is fresh."""
        page = self.page_entry(package, variant)
        if page is None or page.expires_at <= time.time():
            return None
        return page

    def page_entry(self, package: PackageKey, variant: Hashable) -> RenderedPage | None:
        """The page even past its expiry (to be renewed if its sources did not change)."""
        page: RenderedPage | None = self._pages.get((package, variant))
        return page

    def remember_page(self, package: PackageKey, variant: Hashable, page: RenderedPage) -> None:
        old: RenderedPage | None = self._pages.get((package, variant))
        try:
            self._pages[(package, variant)] = page
        except ValueError:  # larger than the whole budget: served, not kept
            self._drop(page)
            return
        if old is not None and old.files != page.files:
            self._drop(old)
        self._variants.setdefault(package, set()).add(variant)

    def invalidate_package(self, package: PackageKey) -> None:
        for variant in self._variants.pop(package, set()):
            page = self._pages.pop((package, variant), None)
            if page is not None:
                self._drop(page)

    def clear_pages(self) -> None:
        for page in self._pages.values():
            self._drop(page)
        self._pages.clear()
        self._variants.clear()

    def _drop(self, page: RenderedPage) -> None:
        if page.files and self._on_page_drop is not None:
            self._on_page_drop(page.files)

    def _page_evicted(self, key: PageKey, page: RenderedPage) -> None:
        self._drop(page)
        package, variant = key
        variants = self._variants.get(package)
        if variants is not None:
            variants.discard(variant)
            if not variants:
                del self._variants[package]

    def stats(self) -> dict[str, Any]:
        return {
            "assets": len(self._assets),
            "listings": len(self._listings),
            "listing_bytes": self._listings.currsize,
            "pages": len(self._pages),
            "page_bytes": self._pages.currsize,
        }
