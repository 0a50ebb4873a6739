"""The blob backend table: ``[storage] backend`` names a row, the row builds the store.

A new backend is one module in storage/ plus one line here (DESIGN.md's seam). Every backend is a
LocalBlobStore for the blobs it holds on this node's disk, which is what keeps a hit a sendfile;
what lies behind that disk (nothing, or a bucket) is the backend's business.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from proxy.config import StorageConfig
from proxy.storage.crypto import Sealer
from proxy.storage.local import LocalBlobStore
from proxy.storage.s3 import S3BlobStore

# (data directory, [storage] table, environment, sealer) → the store
Builder = Callable[[Path, StorageConfig, Mapping[str, str], Sealer | None], LocalBlobStore]

BACKENDS: dict[str, Builder] = {
    "local": lambda data_dir, _config, _env, sealer: LocalBlobStore(data_dir / "blobs", sealer),
    "s3": lambda data_dir, config, env, sealer: S3BlobStore(
        data_dir / "blobs", data_dir / "tmp" / "s3", config, env, sealer
    ),
}


def build_blob_store(
    data_dir: Path, config: StorageConfig, env: Mapping[str, str], sealer: Sealer | None
) -> LocalBlobStore:
    """The store ``config`` names (config.py already checked the name)."""
    return BACKENDS[config.backend](data_dir, config, env, sealer)
