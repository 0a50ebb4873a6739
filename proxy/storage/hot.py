"""The in-memory layer in front of the index: bounded, and invalidated on every write.

Cache hits must not touch SQLite: a warm simple page or a cached wheel is answered from here
plus one ``sendfile``. Every entry is bounded by count (``cachetools.LRUCache``); rendered
pages also carry their own expiry (the earliest expiry of the documents they were built from).
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from cachetools import LRUCache

from proxy.model import AssetRecord, Listing, RepoRef

AssetKey = tuple[RepoRef, str, str, str]  # repository, format, package, filename
PackageKey = tuple[str, str, str]  # domain, format, package


@dataclass(frozen=True, slots=True)
class RenderedPage:
    """A rendered metadata response, ready to send again until ``expires_at``."""

    body: bytes
    content_type: str
    etag: str
    cache_status: str
    expires_at: float
    headers: tuple[tuple[str, str], ...] = ()


class HotCache:
    """Bounded LRU caches for asset rows, parsed listings and rendered pages."""

    def __init__(self, entries: int) -> None:
        self._assets: LRUCache[AssetKey, AssetRecord] = LRUCache(maxsize=entries)
        self._listings: LRUCache[Hashable, Listing] = LRUCache(maxsize=max(16, entries // 8))
        # Pages are grouped by package so one asset write invalidates every variant of it.
        self._pages: LRUCache[PackageKey, dict[Hashable, RenderedPage]] = LRUCache(
            maxsize=max(16, entries // 4)
        )

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
        self._assets.clear()
        self._listings.clear()
        self._pages.clear()

    # parsed listings, keyed by the identity of the document they were parsed from
    def listing(self, key: Hashable) -> Listing | None:
        return self._listings.get(key)

    def remember_listing(self, key: Hashable, listing: Listing) -> None:
        self._listings[key] = listing

    # rendered pages
    def page(self, package: PackageKey, variant: Hashable) -> RenderedPage | None:
        group = self._pages.get(package)
        if group is None:
            return None
        page = group.get(variant)
        if page is None:
            return None
        if page.expires_at <= time.time():
            group.pop(variant, None)
            return None
        return page

    def remember_page(self, package: PackageKey, variant: Hashable, page: RenderedPage) -> None:
        group = self._pages.get(package)
        if group is None:
            group = {}
            self._pages[package] = group
        if len(group) > 64:  # variants are few (repo x content type x host); keep it so
            group.clear()
        group[variant] = page

    def invalidate_package(self, package: PackageKey) -> None:
        self._pages.pop(package, None)

    def clear_pages(self) -> None:
        self._pages.clear()

    def stats(self) -> dict[str, Any]:
        return {
            "assets": len(self._assets),
            "listings": len(self._listings),
            "pages": len(self._pages),
        }
