"""The repository registry: domains and repositories as the index holds them.

The config file seeds it at startup (repositories the file defines are written as the file says
them, so the file stays the source of truth for what it names); repositories created through the
admin API persist in the index across restarts. Lookups are synchronous reads of an in-memory
snapshot, rebuilt after every change, so the request path never waits on SQLite for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from proxy.config import NAME_RE, Config, ConfigError, DomainConfig, RepositoryConfig, validate_domain
from proxy.errors import BadRequest, Conflict, NotFound
from proxy.model import RepoRef
from proxy.storage.catalog import Catalog, RepositoryRow


class RepositoryRegistry:
    """See the module docstring."""

    def __init__(self, catalog: Catalog, connections: Mapping[str, object]) -> None:
        self._catalog = catalog
        self._connections = connections
        self._domains: dict[str, DomainConfig] = {}
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every change of repositories (caches derived from them)."""
        self._listeners.append(listener)

    async def seed(self, config: Config) -> None:
        """Write the config's domains and repositories into the index, then load everything."""
        for domain in config.domains:
            await self._catalog.put_domain(domain.name)
            for repo in domain.repositories:
                await self._catalog.put_repository(_row(domain.name, repo), replace=True)
        await self.reload()
        for domain in self._domains.values():  # API-made repos may reference changed config
            try:
                validate_domain(domain, self._connections)
            except ConfigError as exc:
                raise ConfigError(f"stored repositories no longer fit the config: {exc}") from exc

    async def reload(self) -> None:
        domains: dict[str, list[RepositoryConfig]] = {name: [] for name in await self._catalog.domains()}
        for row in await self._catalog.repositories():
            domains.setdefault(row.domain, []).append(_config(row))
        self._domains = {
            name: DomainConfig(name=name, repositories=tuple(repos)) for name, repos in domains.items()
        }
        for listener in self._listeners:
            listener()

    # --- lookups ------------------------------------------------------------------------------

    def domains(self) -> list[DomainConfig]:
        return [self._domains[name] for name in sorted(self._domains)]

    def domain(self, name: str) -> DomainConfig | None:
        return self._domains.get(name)

    def repository(self, ref: RepoRef) -> RepositoryConfig:
        """The repository, or a 404 that names the missing domain or repository."""
        domain = self._domains.get(ref.domain)
        if domain is None:
            raise NotFound(f"domain {ref.domain!r} does not exist", detail={"domain": ref.domain})
        repo = domain.repository(ref.repository)
        if repo is None:
            raise NotFound(
                f"repository {ref.repository!r} does not exist in domain {ref.domain!r}",
                detail={"domain": ref.domain, "repository": ref.repository},
            )
        return repo

    def downstreams(self, ref: RepoRef) -> list[str]:
        """Repositories of the domain that list ``ref`` as an upstream."""
        domain = self._domains.get(ref.domain)
        if domain is None:
            return []
        return [r.name for r in domain.repositories if ref.repository in r.upstreams]

    # --- changes ------------------------------------------------------------------------------

    async def create_domain(self, name: str) -> DomainConfig:
        if not NAME_RE.match(name):
            raise BadRequest(f"invalid domain name {name!r}: expected [a-z][a-z0-9-]{{1,49}}")
        if not await self._catalog.put_domain(name):
            raise Conflict(f"domain {name!r} already exists", detail={"domain": name})
        await self.reload()
        return self._domains[name]

    async def delete_domain(self, name: str) -> None:
        domain = self._domains.get(name)
        if domain is None:
            raise NotFound(f"domain {name!r} does not exist", detail={"domain": name})
        if domain.repositories:
            raise Conflict(
                f"domain {name!r} still has repositories: {', '.join(r.name for r in domain.repositories)}"
            )
        await self._catalog.delete_domain(name)
        await self.reload()

    async def create_repository(
        self, domain: str, repo: RepositoryConfig, *, replace: bool = False
    ) -> RepositoryConfig:
        current = self._domains.get(domain)
        if current is None:
            raise NotFound(f"domain {domain!r} does not exist", detail={"domain": domain})
        if not NAME_RE.match(repo.name):
            raise BadRequest(f"invalid repository name {repo.name!r}: expected [a-z][a-z0-9-]{{1,49}}")
        connections = self._connections

        def check(stored: list[RepositoryRow]) -> None:
            # Runs inside the write transaction on what the index holds now, so two changes
            # racing (from two processes, say) cannot together close a cycle.
            if not replace and any(r.name == repo.name for r in stored):
                raise Conflict(
                    f"repository {repo.name!r} already exists in domain {domain!r}",
                    detail={"domain": domain, "repository": repo.name},
                )
            others = tuple(_config(r) for r in stored if r.name != repo.name)
            try:
                validate_domain(DomainConfig(domain, (*others, repo)), connections)
            except ConfigError as exc:
                raise BadRequest(str(exc)) from exc

        await self._catalog.put_repository_checked(_row(domain, repo), check)
        await self.reload()
        return repo

    async def delete_repository(self, ref: RepoRef) -> None:
        self.repository(ref)
        users = self.downstreams(ref)
        if users:
            raise Conflict(
                f"repository {ref.repository!r} is an upstream of {', '.join(users)}; "
                "remove it from their upstreams first"
            )
        await self._catalog.delete_repository(ref)
        await self.reload()


def _config(row: RepositoryRow) -> RepositoryConfig:
    return RepositoryConfig(
        name=row.name,
        upstreams=row.upstreams,
        description=row.description,
        min_release_age=row.min_release_age,
        allow_redeploy=row.allow_redeploy,
        anonymous_read=row.anonymous_read,
    )


def _row(domain: str, repo: RepositoryConfig) -> RepositoryRow:
    return RepositoryRow(
        domain=domain,
        name=repo.name,
        description=repo.description,
        upstreams=repo.upstreams,
        min_release_age=repo.min_release_age,
        created_at=time.time(),
        allow_redeploy=repo.allow_redeploy,
        anonymous_read=repo.anonymous_read,
    )
