"""What adapters may ask the pipeline for, bundled once in ``build_app``."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.config import Config
from proxy.pipeline.packages import PackageService
from proxy.pipeline.publish import Publisher
from proxy.pipeline.registry import RepositoryRegistry
from proxy.pipeline.resolve import Resolver
from proxy.security.audit import AuditLog
from proxy.security.policy import Policies
from proxy.security.tokens import TokenStore
from proxy.server.assets import AssetSender
from proxy.server.pages import PageStore
from proxy.storage.hot import HotCache
from proxy.storage.local import LocalBlobStore


@dataclass(frozen=True, slots=True)
class Pipeline:
    """The shared services. Adapters call these; they never reach SQL or files themselves."""

    config: Config
    resolver: Resolver
    publisher: Publisher
    registry: RepositoryRegistry
    packages: PackageService
    hot: HotCache
    blobs: LocalBlobStore
    sender: AssetSender
    pages: PageStore
    audit: AuditLog
    tokens: TokenStore
    policies: Policies
