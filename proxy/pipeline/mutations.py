"""Cached files stay as cached when an upstream changes them (invariant 3), and that is reported.

An upstream may republish a release with other bytes, declaring their hashes in its next
document. The cache never follows: the file it holds keeps being served, and the listing keeps
describing those bytes (so a client that checks the document's digest against the bytes it
downloads is not refused). The mutation is logged as an error, once per file and declared digest,
naming the upstream, the file and both digests.

Comparing needs the cached blob's hashes in the upstream's algorithms (npm declares SHA-512 and
SHA-1, NuGet SHA-512): SHA-256 is the blob's name; others are computed from the blob in a worker
thread, once per blob and set of algorithms.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from proxy.model import CHECKABLE_HASHES, AssetRecord, Digest, Listing
from proxy.storage.local import LocalBlobStore

if TYPE_CHECKING:
    from proxy.formats.base import FormatAdapter

log = logging.getLogger("proxy.mutation")

MEMO_LIMIT = 4096
CHUNK = 1024 * 1024


class MutationGuard:
    """See the module docstring. One per resolver."""

    def __init__(self, blobs: LocalBlobStore) -> None:
        self._blobs = blobs
        self._hashes: dict[tuple[str, tuple[str, ...]], dict[str, str]] = {}
        self._reported: set[tuple[str, str, str]] = set()

    async def keep_cached(
        self, adapter: FormatAdapter, listing: Listing, stored: Mapping[str, AssetRecord]
    ) -> Listing:
        """``listing`` with every cached upstream file described by its cached bytes."""
        files = list(listing.files)
        changed = False
        for i, entry in enumerate(files):
            record = stored.get(entry.filename)
            if record is None or record.hosted or not entry.source:
                continue
            declared = {a: v.lower() for a, v in entry.hashes.items() if a in CHECKABLE_HASHES and v}
            if not declared:
                continue
            actual = await self._hashes_of(record.digest, tuple(sorted(declared)))
            if actual is None or actual == declared:
                continue
            self._report(entry.source, entry.filename, record, declared)
            files[i] = adapter.describe_cached(entry, actual, record.size)
            changed = True
        return replace(listing, files=tuple(files)) if changed else listing

    def _report(self, upstream: str, filename: str, record: AssetRecord, declared: Mapping[str, str]) -> None:
        key = (record.digest.hex, filename, repr(sorted(declared.items())))
        if key in self._reported:
            return
        if len(self._reported) > MEMO_LIMIT:
            self._reported.clear()
        self._reported.add(key)
        log.error(
            "mutation: upstream %s changed the bytes of %s %s (it now declares %s); the cached "
            "file (sha256 %s) is kept and served, the upstream's new bytes are not followed",
            upstream,
            record.package,
            filename,
            ", ".join(f"{a} {v}" for a, v in sorted(declared.items())),
            record.digest.hex,
        )

    async def _hashes_of(self, digest: Digest, algorithms: tuple[str, ...]) -> dict[str, str] | None:
        """The blob's digests in ``algorithms`` (None when the blob is not readable)."""
        if algorithms == ("sha256",):
            return {"sha256": digest.hex}
        key = (digest.hex, algorithms)
        found = self._hashes.get(key)
        if found is not None:
            return found
        try:
            if await self._blobs.locate(digest) == "missing":
                return None
            found = await asyncio.to_thread(self._compute, digest, algorithms)
        except OSError:
            return None
        if len(self._hashes) > MEMO_LIMIT:
            self._hashes.clear()
        self._hashes[key] = found
        return found

    def _compute(self, digest: Digest, algorithms: tuple[str, ...]) -> dict[str, str]:
        hashers = {a: hashlib.new(a) for a in algorithms if a != "sha256"}
        with self._blobs.open_plain(digest) as f:
            while chunk := f.read(CHUNK):
                for h in hashers.values():
                    h.update(chunk)
        out = {a: h.hexdigest() for a, h in hashers.items()}
        if "sha256" in algorithms:
            out["sha256"] = digest.hex
        return out
