"""The in-memory layer stays within its byte budget and forgets what a write makes stale."""

from __future__ import annotations

import time
from pathlib import Path

from proxy.model import Listing
from proxy.storage.hot import HotCache, RenderedPage
from proxy.storage.page_files import PageFiles


def _page(size: int) -> RenderedPage:
    return RenderedPage(b"x" * size, "text/html", '"e"', "MISS", time.time() + 60)


def test_pages_are_bounded_by_bytes_not_count() -> None:
    hot = HotCache(entries=64, memory_bytes=2 * 1024 * 1024)  # 1 MiB for pages
    for i in range(10):
        hot.remember_page(("d", "npm", f"pkg{i}"), "v", _page(300 * 1024))
    stats = hot.stats()
    assert stats["page_bytes"] <= 1024 * 1024
    assert stats["pages"] == 3  # the newest three fit
    assert hot.page(("d", "npm", "pkg9"), "v") is not None
    assert hot.page(("d", "npm", "pkg0"), "v") is None


def test_a_page_larger_than_the_budget_is_not_kept() -> None:
    hot = HotCache(entries=64, memory_bytes=64 * 1024)
    hot.remember_page(("d", "npm", "huge"), "v", _page(1024 * 1024))
    assert hot.page(("d", "npm", "huge"), "v") is None
    assert hot.stats()["page_bytes"] == 0


def test_invalidating_a_package_drops_every_variant_and_evictions_keep_the_index_true() -> None:
    hot = HotCache(entries=64, memory_bytes=1024 * 1024)
    key = ("d", "pypi", "alpha")
    hot.remember_page(key, ("public", "json"), _page(10))
    hot.remember_page(key, ("public", "html"), _page(10))
    hot.invalidate_package(key)
    assert hot.page(key, ("public", "json")) is None and hot.page(key, ("public", "html")) is None
    for i in range(100):  # push everything out; the variant index must not keep ghosts
        hot.remember_page(("d", "pypi", f"p{i}"), "v", _page(20 * 1024))
    assert len(hot._variants) == hot.stats()["pages"]


def test_listings_are_bounded_by_their_document_size() -> None:
    hot = HotCache(entries=64, memory_bytes=2 * 1024 * 1024)
    for i in range(5):
        hot.remember_listing(("up", i), Listing(package=f"p{i}"), size=400 * 1024)
    assert hot.stats()["listing_bytes"] <= 1024 * 1024
    assert hot.listing(("up", 4)) is not None
    assert hot.listing(("up", 0)) is None


def test_pages_in_files_are_deleted_after_a_grace_period_once_dropped(tmp_path: Path) -> None:
    files = PageFiles(tmp_path / "pages", grace=60.0)
    files.prepare()
    hot = HotCache(entries=64, memory_bytes=1024 * 1024, on_page_drop=files.retire)
    written = files.write({"": b"{}" * 1000, "gzip": b"zz"})
    page = RenderedPage(b"", "application/json", '"e"', "MISS", time.time() + 60, files=written)
    hot.remember_page(("d", "npm", "big"), "v", page)
    assert page.weight() < 2000 + 512  # a sixteenth of the bytes on disk, plus the overhead
    hot.invalidate_package(("d", "npm", "big"))
    assert files.sweep() == 0  # a response may still be opening them
    assert all(Path(path).exists() for _, path, _ in written)
    assert files.sweep(now=time.monotonic() + 61) == 2
    assert list((tmp_path / "pages").iterdir()) == []
