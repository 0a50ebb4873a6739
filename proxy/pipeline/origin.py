"""Package origin controls: which versions of a package a repository takes from where.

Modelled on CodeArtifact's package origin configuration, and the defence against dependency
confusion. Per package name or name prefix, two switches:

- ``publish`` (ALLOW/BLOCK): may versions be published into this repository;
- ``upstream`` (ALLOW/BLOCK): may versions come from its upstreams.

Default: publishing is allowed; upstream versions are allowed *until the package has a version
published in the repository*, after which they are blocked unless a rule allows them. On top of
that a repository may set a minimum release age (upstream versions younger than it are hidden
until they age in) and a quarantine list of ``package@version`` patterns never served. Whatever
hides a file says why: the rule is named in the 404 for its URL.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from proxy.storage.catalog import OriginRule, QuarantineEntry

ALLOW = "ALLOW"
BLOCK = "BLOCK"


@dataclass(frozen=True, slots=True)
class PackagePolicy:
    """Everything that decides what one package may show in one repository."""

    rule: OriginRule | None = None
    has_hosted: bool = False
    quarantine: tuple[QuarantineEntry, ...] = field(default=())
    min_release_age: float = 0.0
    statuses: Mapping[str, str] = field(default_factory=dict)  # this repository's own versions
    attributes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def upstream_block_reason(self) -> str | None:
        """Why upstream versions are blocked, or None when they are allowed."""
        if self.rule is not None:
            if self.rule.upstream == BLOCK:
                return f"origin rule {self.rule.pattern!r} blocks upstream versions"
            return None
        if self.has_hosted:
            return (
                "upstream versions are blocked because this package is published in this "
                "repository (set an origin rule with upstream=ALLOW to allow them)"
            )
        return None

    def publish_block_reason(self) -> str | None:
        if self.rule is not None and self.rule.publish == BLOCK:
            return f"origin rule {self.rule.pattern!r} blocks publishing"
        return None

    def quarantine_reason(self, package: str, version: str | None) -> str | None:
        for entry in self.quarantine:
            name_pattern, _, version_pattern = entry.pattern.partition("@")
            if not fnmatch.fnmatchcase(package, name_pattern):
                continue
            if version_pattern and (version is None or not fnmatch.fnmatchcase(version, version_pattern)):
                continue
            why = f": {entry.reason}" if entry.reason else ""
            return f"{package}@{version} is quarantined by {entry.pattern!r}{why}"
        return None

    def age_reason(self, upload_time: str | None, now: float) -> str | None:
        """Why a version is too young to be served, or None (unknown upload times pass)."""
        if not self.min_release_age or not upload_time:
            return None
        try:
            uploaded = datetime.fromisoformat(upload_time.replace("Z", "+00:00"))
        except ValueError:
            return None
        if uploaded.tzinfo is None:
            uploaded = uploaded.replace(tzinfo=UTC)
        age = now - uploaded.timestamp()
        if age >= self.min_release_age:
            return None
        return (
            f"released {age / 3600:.1f}h ago, younger than this repository's minimum release age "
            f"of {self.min_release_age / 3600:.1f}h"
        )


def matching_rule(package: str, rules: list[OriginRule]) -> OriginRule | None:
    """The exact rule for ``package``, else the longest matching prefix rule (``acme-*``)."""
    best: OriginRule | None = None
    for rule in rules:
        if rule.pattern == package:
            return rule
        is_prefix = rule.pattern.endswith("*") and package.startswith(rule.pattern[:-1])
        if is_prefix and (best is None or len(rule.pattern) > len(best.pattern)):
            best = rule
    return best


def valid_switch(value: str) -> bool:
    return value in {ALLOW, BLOCK}
