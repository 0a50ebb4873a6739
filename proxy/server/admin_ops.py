"""The admin operations shared by the HTTP API (server/admin.py) and the CLI (cli_admin.py).

Each returns the JSON value the API answers with, so the CLI's ``--json`` output and the API
never drift apart. The rules live in the services (``pipeline/registry.py``,
``pipeline/packages.py``); here are only the checks that belong to the interface: formats by
name, package names and patterns made canonical by their adapter.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from proxy.config import ConfigError, DomainConfig, RepositoryConfig, parse_duration
from proxy.errors import BadRequest, NotFound
from proxy.formats import FORMATS
from proxy.formats.base import FormatAdapter
from proxy.model import RepoRef
from proxy.pipeline.dependencies import DependencyService
from proxy.pipeline.services import Pipeline
from proxy.storage.catalog import OriginRule, QuarantineEntry

Json = dict[str, Any]
_WILDCARDS = frozenset("*?[")


def parse_min_release_age(value: object) -> float:
    """Seconds, from a number of seconds or a duration such as ``"3d"``; BadRequest otherwise."""
    try:
        return parse_duration(value, "min_release_age")
    except ConfigError as exc:
        raise BadRequest(str(exc)) from exc


class AdminOps:
    """The admin operations, answered as JSON values (shared by the API and the CLI)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._config = pipeline.config
        self._registry = pipeline.registry
        self._packages = pipeline.packages
        self._adapters: dict[str, FormatAdapter] = {cls.name: cls(pipeline) for cls in FORMATS}
        self.dependencies = DependencyService(pipeline)
        # The registry checks a change against its snapshot, then writes: two changes at once
        # could each pass alone and together form an upstream cycle. One change at a time.
        self._changing = asyncio.Lock()

    # --- formats and names --------------------------------------------------------------------

    def adapter(self, fmt: str) -> FormatAdapter:
        adapter = self._adapters.get(fmt)
        if adapter is None:
            raise NotFound(
                f"unknown format {fmt!r} (served: {', '.join(sorted(self._adapters))})",
                detail={"format": fmt},
            )
        return adapter

    def formats(self, fmt: str | None) -> list[str]:
        return [self.adapter(fmt).name] if fmt else sorted(self._adapters)

    def _ref(self, domain: str, repo: str) -> RepoRef:
        """The repository's reference, after a 404 if it does not exist."""
        ref = RepoRef(domain, repo)
        self._registry.repository(ref)
        return ref

    def _package(self, fmt: str, package: str) -> str:
        return self.adapter(fmt).normalize(package)

    def _rule_pattern(self, fmt: str, pattern: str) -> str:
        """A package name, or a name prefix ending in ``*``, made canonical like package names."""
        if not pattern or "*" in pattern[:-1]:
            raise BadRequest(
                "pattern: a package name or a name prefix ending in '*' (such as 'acme-*')",
                detail={"field": "pattern"},
            )
        if not pattern.endswith("*"):
            return self._package(fmt, pattern)
        prefix = pattern[:-1]
        if not prefix:
            return "*"
        try:
            return self.adapter(fmt).normalize_prefix(prefix) + "*"
        except BadRequest as exc:
            raise BadRequest(
                f"pattern: {prefix!r} is not the start of a valid package name", detail={"field": "pattern"}
            ) from exc

    def _quarantine_pattern(self, fmt: str, pattern: str) -> str:
        """``package`` or ``package@version``; a name without wildcards is made canonical."""
        name, at, version = pattern.partition("@")
        if not name or (at and not version):
            raise BadRequest(
                "pattern: 'package' or 'package@version' (wildcards * ? [] allowed)",
                detail={"field": "pattern"},
            )
        if not _WILDCARDS & set(name):
            name = self._package(fmt, name)
        return f"{name}{at}{version}"

    # --- domains ------------------------------------------------------------------------------

    def domains(self) -> Json:
        return {"domains": [_domain_json(d) for d in self._registry.domains()]}

    def domain(self, name: str) -> Json:
        return _domain_json(self._domain(name))

    def _domain(self, name: str) -> DomainConfig:
        domain = self._registry.domain(name)
        if domain is None:
            raise NotFound(f"domain {name!r} does not exist", detail={"domain": name})
        return domain

    async def create_domain(self, name: str) -> Json:
        async with self._changing:
            return _domain_json(await self._registry.create_domain(name))

    async def delete_domain(self, name: str) -> None:
        async with self._changing:
            await self._registry.delete_domain(name)

    # --- repositories -------------------------------------------------------------------------

    def repositories(self, domain: str) -> Json:
        return {
            "repositories": [
                self._repo_json(domain, r.name) for r in sorted(self._domain(domain).repositories, key=_name)
            ]
        }

    def repository(self, domain: str, name: str) -> Json:
        return self._repo_json(domain, name)

    def from_config(self, domain: str, name: str) -> bool:
        """Whether the config file names this repository (the proxy rewrites it at startup)."""
        configured = self._config.domain(domain)
        return configured is not None and configured.repository(name) is not None

    def _repo_json(self, domain: str, name: str) -> Json:
        ref = RepoRef(domain, name)
        repo = self._registry.repository(ref)
        return {
            "domain": domain,
            "name": repo.name,
            "description": repo.description,
            "upstreams": list(repo.upstreams),
            "min_release_age": repo.min_release_age,
            "allow_redeploy": repo.allow_redeploy,
            "anonymous_read": repo.anonymous_read,
            "downstreams": self._registry.downstreams(ref),
            "from_config": self.from_config(domain, name),
        }

    async def create_repository(
        self,
        domain: str,
        name: str,
        upstreams: list[str],
        description: str = "",
        min_release_age: float = 0.0,
        allow_redeploy: bool = False,
        anonymous_read: bool = False,
    ) -> Json:
        repo = RepositoryConfig(
            name=name,
            upstreams=_unique(upstreams),
            description=description,
            min_release_age=min_release_age,
            allow_redeploy=allow_redeploy,
            anonymous_read=anonymous_read,
        )
        async with self._changing:
            await self._registry.create_repository(domain, repo)
        return self._repo_json(domain, name)

    async def set_upstreams(self, domain: str, name: str, upstreams: list[str]) -> Json:
        async with self._changing:
            current = self._registry.repository(RepoRef(domain, name))
            changed = replace(current, upstreams=_unique(upstreams))
            await self._registry.create_repository(domain, changed, replace=True)
        return self._repo_json(domain, name)

    async def delete_repository(self, domain: str, name: str) -> None:
        async with self._changing:
            await self._registry.delete_repository(RepoRef(domain, name))

    # --- packages -----------------------------------------------------------------------------

    async def packages(self, domain: str, repo: str, fmt: str | None = None) -> Json:
        ref = self._ref(domain, repo)
        if fmt is not None:
            self.adapter(fmt)
        return {"packages": await self._packages.list_packages(ref, fmt)}

    async def package(self, domain: str, repo: str, fmt: str, package: str) -> Json:
        ref = self._ref(domain, repo)
        return await self._packages.describe(ref, fmt, self._package(fmt, package))

    async def set_status(
        self, domain: str, repo: str, fmt: str, package: str, version: str, status: str
    ) -> Json:
        ref = self._ref(domain, repo)
        name = self._package(fmt, package)
        await self._packages.set_status(ref, fmt, name, version, status)
        return _version_ref(ref, fmt, name, version) | {"status": status}

    async def delete_version(self, domain: str, repo: str, fmt: str, package: str, version: str) -> None:
        ref = self._ref(domain, repo)
        await self._packages.delete(ref, fmt, self._package(fmt, package), version)

    async def copy_version(
        self, domain: str, repo: str, fmt: str, package: str, version: str, to: str
    ) -> Json:
        src, dst = self._ref(domain, repo), RepoRef(domain, to)
        name = self._package(fmt, package)
        if dst == src:
            raise BadRequest("to: the destination is the source repository")
        await self._packages.copy(src, dst, fmt, name, version)
        return _version_ref(dst, fmt, name, version) | {"status": "Published", "copied_from": repo}

    # --- origin rules and quarantine ------------------------------------------------------------

    async def origin_rules(self, domain: str, repo: str, fmt: str | None = None) -> Json:
        ref = self._ref(domain, repo)
        rules = [
            _rule_json(f, rule)
            for f in self.formats(fmt)
            for rule in await self._packages.origin_rules(ref, f)
        ]
        return {"rules": rules}

    async def put_origin_rule(
        self, domain: str, repo: str, fmt: str, pattern: str, publish: str, upstream: str
    ) -> Json:
        ref = self._ref(domain, repo)
        rule = OriginRule(self._rule_pattern(fmt, pattern), publish, upstream)
        await self._packages.put_origin_rule(ref, fmt, rule)
        return _rule_json(fmt, rule)

    async def delete_origin_rule(self, domain: str, repo: str, fmt: str, pattern: str) -> None:
        ref = self._ref(domain, repo)
        await self._packages.delete_origin_rule(ref, fmt, self._rule_pattern(fmt, pattern))

    async def quarantine(self, domain: str, repo: str, fmt: str | None = None) -> Json:
        ref = self._ref(domain, repo)
        entries = [
            _quarantine_json(f, entry)
            for f in self.formats(fmt)
            for entry in await self._packages.quarantine(ref, f)
        ]
        return {"entries": entries}

    async def put_quarantine(self, domain: str, repo: str, fmt: str, pattern: str, reason: str) -> Json:
        ref = self._ref(domain, repo)
        entry = QuarantineEntry(self._quarantine_pattern(fmt, pattern), reason)
        await self._packages.put_quarantine(ref, fmt, entry)
        # The incident question in the same answer: which held versions depend on what is hidden.
        report = await self.dependencies.quarantine_report(ref, fmt, entry.pattern)
        return {**_quarantine_json(fmt, entry), "dependents": report}

    async def delete_quarantine(self, domain: str, repo: str, fmt: str, pattern: str) -> None:
        ref = self._ref(domain, repo)
        await self._packages.delete_quarantine(ref, fmt, self._quarantine_pattern(fmt, pattern))


def _unique(upstreams: list[str]) -> tuple[str, ...]:
    seen = [u for i, u in enumerate(upstreams) if u in upstreams[:i]]
    if seen:
        raise BadRequest(f"upstreams: {seen[0]!r} is listed twice", detail={"field": "upstreams"})
    return tuple(upstreams)


def _name(repo: RepositoryConfig) -> str:
    return repo.name


def _domain_json(domain: DomainConfig) -> Json:
    return {"name": domain.name, "repositories": sorted(r.name for r in domain.repositories)}


def _version_ref(ref: RepoRef, fmt: str, package: str, version: str) -> Json:
    return {
        "domain": ref.domain,
        "repository": ref.repository,
        "format": fmt,
        "package": package,
        "version": version,
    }


def _rule_json(fmt: str, rule: OriginRule) -> Json:
    return {"format": fmt, "pattern": rule.pattern, "publish": rule.publish, "upstream": rule.upstream}


def _quarantine_json(fmt: str, entry: QuarantineEntry) -> Json:
    return {"format": fmt, "pattern": entry.pattern, "reason": entry.reason}
